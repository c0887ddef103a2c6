"""``kelix estimate``: what a recipe's run costs before it is launched, from the recipe and the model configs
alone (no weights: the models are built on the ``meta`` device, so parameter counts are exact).

* :mod:`kelix.estimate.recipe`: the recipe (several ``--config`` files merged) and the run's shape (GPUs,
  strategy, precision, micro-batch, accumulation).
* :mod:`kelix.estimate.models`: each part of the run (backbone, head, block decoder, LoRA adapters, frozen
  tokenizer / VAE / condition LLM, DiT and its EMA) built on ``meta`` with the module's own freezing.
* :mod:`kelix.estimate.memory`: memory per GPU (weights, gradients, AdamW state, activations with and without
  checkpointing, FSDP2 sharding and gathering, autocast copies), FLOPs and time per step, and the knobs that
  make a run fit.
* :mod:`kelix.estimate.cli`: the verb.
"""

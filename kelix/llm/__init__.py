"""The unified LLM with next-block prediction (paper 3.2, 4.3).

* ``vocab``: the extended vocabulary (``visual_offset``, N, K, special ids, per-slot legal ranges);
* ``layout``: chat template, segments and the visual processor (row markers) -> block documents;
* ``data``: ``LLMProcessor`` (codes or pixels, generation targets at a fixed size) and packing;
* ``embed`` / ``decoder`` / ``model``: block encoder (Eq. 4), block decoders (Eq. 6), ``KelixLM``;
* ``loss`` / ``module``: the NBP loss and ``UnifiedLLMModule`` (every stage is a recipe);
* ``condition``: the hidden states the DiT is conditioned on; ``generate``: KV-cached generation;
* ``unify`` / ``export``: the ``unify-embeddings`` and ``export-llm`` verbs.
"""

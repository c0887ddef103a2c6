"""LoRA fine-tuning (through ``peft``): adapters on a network's linear layers, the rest frozen unless named,
checkpoints that hold only what trains, and the merge back into plain weights for export.

:mod:`kelix.lora.adapters` holds the network-agnostic part (:class:`LoRAConfig`, inject, merge);
:mod:`kelix.lora.llm` what the unified LLM adds (which of its parts train, the LM head's visual rows).
"""

from kelix.lora.adapters import LoRAConfig, apply_lora, merge_lora_, merge_lora_state_dict

__all__ = ["LoRAConfig", "apply_lora", "merge_lora_", "merge_lora_state_dict"]

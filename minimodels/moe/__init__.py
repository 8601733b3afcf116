"""Mixture of experts: gates that return their routing as plain values, the aux losses, and the MoE layer.

    routing.py   Routing, expert capacity, load_balancing_loss, router_z_loss
    gates.py     TopKGate, NoisyTopKGate, SwitchGate, GShardGate, ExpertChoiceGate, build_gate, check_gate
    layer.py     MoE (sort-and-split dispatch over any experts) and moe_reference (the per-token loop)
    config.py    model.moe: which blocks of GPT / BERT / T5 get an MoE FFN, the model's MoE loss and metrics,
                 and sparse upcycling (an MoE model started from a dense run)
    all_to_all.py  expert parallelism in one layer: each token slot sent by all-to-all to its expert's process
    parallel.py  expert parallelism in a model: its MoE layers' experts sharded over the processes
"""

from minimodels.moe.config import MoEConfig, add_moe_loss, build_block_ffn, is_moe_block, upcycle
from minimodels.moe.gates import (GATES, ExpertChoiceGate, GShardGate, NoisyTopKGate, SwitchGate, TopKGate,
                                  build_gate, check_gate)
from minimodels.moe.layer import MoE, moe_reference
from minimodels.moe.routing import Routing, expert_capacity, load_balancing_loss, router_z_loss

__all__ = ["Routing", "TopKGate", "NoisyTopKGate", "SwitchGate", "GShardGate", "ExpertChoiceGate", "MoE",
           "load_balancing_loss", "router_z_loss", "expert_capacity", "moe_reference", "build_gate", "check_gate",
           "GATES", "MoEConfig", "build_block_ffn", "is_moe_block", "add_moe_loss", "upcycle"]

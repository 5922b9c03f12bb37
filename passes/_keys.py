"""Names of the ``node.meta`` keys fxpart writes (all prefixed ``fxpart.``).

Analyses write only these keys; PyTorch's own keys (``val``, ``tensor_meta``,
``example_value``, ``nn_module_stack``, ``stack_trace``) are read, never written.
"""

COST = "fxpart.cost"            # NodeCost of the node (flops, bytes, time)
CAPTURE = "fxpart.capture"      # on gm.meta: how the graph was captured
ESTIMATE = "fxpart.estimate"    # on gm.meta: the last Estimate computed for the graph
PHASE = "fxpart.phase"          # on gm.meta: "dynamo", "forward", "backward" or "inference" (compile backend)
SHARD = "fxpart.shard"          # on tensor-parallel shard nodes: the Shard layout of a sharded value
COLLECTIVE = "fxpart.collective"  # on tensor-parallel shard nodes: {"kind", "bytes", "block"} of a collective
LOCAL_SLICE = "fxpart.local_slice"  # a shard node that slices a replicated value to its Shard (tensor plans)
EXAMPLE_VAL = "fxpart.example_val"  # a symbolic node value at the example batch's sizes (read via _util.node_value)
SIGNATURE = "fxpart.signature"  # on gm.meta: the InputSignature of a captured graph (names, dims, constants)
ORIGIN = "fxpart.origin"       # on a rewritten graph's node: the name of the input graph's node it computes

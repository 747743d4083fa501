"""Everything rank-aware: process groups, routed TP projections, megatron-core config."""

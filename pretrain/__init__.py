"""maskpot pretraining: GNN models, pretext transforms and losses, the DeepSpeed loop, exports."""

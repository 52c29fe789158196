"""Example configs, shipped as package data `maskpot.configs` (pretrain/, finetune/, study/, cluster/)."""

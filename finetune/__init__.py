"""maskpot finetuning: energy/force training from exports, MLflow tracking, evaluation, the CLI."""

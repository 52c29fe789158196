"""`maskpot study`: config (validated whole on load), stages (corpus, shards, pretrainings, finetunes),
ablations and the report (REPORT.md's tables and plots)."""

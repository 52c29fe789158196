"""The test suite: one folder per package (data_shards, pretrain, finetune, cluster, maskpot), shared
fixtures in conftest.py, shared helpers in helpers/. Packages so that `tests.helpers` imports from any folder."""

"""Training stages on Ray Train + DeepSpeed: `train-bc` (r2v.train.bc:run_train_bc) and `train-dpo`
(r2v.train.dpo:run_train_dpo). Import the submodules directly; this package imports nothing heavy."""

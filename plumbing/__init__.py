"""The machinery under the method: specdec's fast paths and checks, the command line, run
directories, checkpoints, FSDP sharding and the training run's checks."""

"""The run pipeline: the one preflight, run / dry run, recover, the record schema."""

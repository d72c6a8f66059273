from kdhpc.ops.data_consistency import data_consistency, data_consistency_reference  # noqa: F401

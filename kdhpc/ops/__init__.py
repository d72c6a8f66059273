from kdhpc.ops.data_consistency import data_consistency, data_consistency_reference  # noqa: F401
from kdhpc.ops.softmax_kl import softmax_kl, softmax_kl_reference  # noqa: F401
from kdhpc.ops.attention_map import attention_map, attention_map_loss  # noqa: F401

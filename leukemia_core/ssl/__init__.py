"""Self-supervised pretraining (issue 19): FCMAE for the hybrid's ConvNeXtV2 branch."""
from leukemia_core.ssl.fcmae import FCMAEConfig, FCMAETask, load_fcmae, masked_loss, pretrain_fcmae

__all__ = ["FCMAEConfig", "FCMAETask", "load_fcmae", "masked_loss", "pretrain_fcmae"]

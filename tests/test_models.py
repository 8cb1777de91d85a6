import pytest
import torch

from leukemia_core.errors import UnknownNameError
from leukemia_core.models import create_model, list_models


def test_timm_models_pass_through():
    m = create_model("resnet18", num_classes=5).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_registered_model_and_errors():
    assert "efficientnet_lite0" in list_models()
    assert create_model("efficientnet_lite0", num_classes=4).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(UnknownNameError, match="unknown model 'no_such_net'"):
        create_model("no_such_net", 3)
    with pytest.raises(UnknownNameError, match="no offline pretrained weights for 'resnet18'"):
        create_model("resnet18", 3, pretrained=True)

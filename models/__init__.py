"""Reference architectures written for graphprune (random init): the embedded defaults of the
examples, the CLI and the tests. ``ZOO`` maps a name to (constructor, example input shape)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .audio import audio_net
from .densenet import densenet_small
from .digits import digits_net
from .inception import inception_small
from .lenet import lenet5
from .llama import Llama, LlamaConfig, llama_small
from .mobilenetv2 import mobilenet_v2_cifar
from .recurrent import audio_gru, bilstm_tagger, proj_lstm, text_lstm
from .resnet_cifar import resnet20, resnet56
from .senet import se_resnet_small
from .shufflenet import shufflenet_small
from .vgg import vgg11_bn

ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet5": (lenet5, (1, 1, 32, 32)),
    "resnet20": (resnet20, (1, 3, 32, 32)),
    "resnet56": (resnet56, (1, 3, 32, 32)),
    "vgg11_bn": (vgg11_bn, (1, 3, 32, 32)),
    "mobilenet_v2": (mobilenet_v2_cifar, (1, 3, 32, 32)),
    "densenet": (densenet_small, (1, 3, 32, 32)),
    "inception": (inception_small, (1, 3, 32, 32)),
    "shufflenet": (shufflenet_small, (1, 3, 32, 32)),
    "se_resnet": (se_resnet_small, (1, 3, 32, 32)),
    "audio": (audio_net, (1, 1, 4000)),
    "audio_gru": (audio_gru, (1, 1, 4000)),
    "digits": (digits_net, (1, 1, 8, 8)),
}
# token models take int64 inputs: name -> (constructor, example input)
TOKEN_MODELS = {"llama_small": (llama_small, (1, 16)), "text_lstm": (text_lstm, (1, 16)),
                "bilstm_tagger": (bilstm_tagger, (1, 16))}
# proj_lstm (input (1, 15, 40)) is not in ZOO: torch exports no LSTM with projections to ONNX
# (neither exporter), which every ZOO model must

__all__ = ["TOKEN_MODELS", "ZOO", "Llama", "LlamaConfig", "audio_gru",
           "audio_net", "bilstm_tagger", "densenet_small", "digits_net", "inception_small", "lenet5",
           "llama_small", "mobilenet_v2_cifar", "proj_lstm", "resnet20", "resnet56",
           "se_resnet_small", "shufflenet_small", "text_lstm", "vgg11_bn"]

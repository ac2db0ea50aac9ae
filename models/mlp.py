"""Sequential and MLP: the chain rule applied layer by layer, from the output back to the input.

Shapes: N batch, widths[0] in, widths[-1] out.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from models.activations import activation as make_activation
from models.layer import Layer, _hooks_on, _hooks_on_every_module
from models.linear import Linear


class Sequential(Layer):
    """Layers run in order forward, and in reverse order backward.

    Args:
        *layers: ``Layer`` instances; each one's output is the next one's input.
    """

    holds_parameters = True

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes Layer instances; item {i} is {type(layer).__name__}")
            self.add_module(str(i), layer)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> Layer:
        return list(self._modules.values())[index]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x: Tensor) -> Tensor:
        # Each layer as Layer.__call__ would call it, with the check for global hooks made once for all
        if _hooks_on_every_module():
            for layer in self._modules.values():
                x = layer(x)
            return x
        new = False  # whether x is a tensor the layer before made and nothing else holds (Layer.returns_new)
        for layer in self._modules.values():
            if _hooks_on(layer):  # a hook may keep the output: never overwrite it
                x, new = layer(x), False
            else:
                cls = type(layer)
                in_place = new and cls.forward is cls._forward_in_place_of  # layer.in_place_ok("forward")
                x = layer.forward_in_place(x) if in_place else layer.forward(x)
                new = layer.returns_new
        return x

    # y = fₖ(…f₁(x))  ⇒  ∂C/∂x = f₁'ᵀ(… fₖ'ᵀ(g)): each layer's backward feeds the one below it
    def backward(self, grad_output: Tensor, *, accumulate: bool = True, input_grad: bool = True) -> Tensor | None:
        """Each layer's backward, last first; ``accumulate`` and ``input_grad`` as in ``Layer``."""
        grad = grad_output
        new = False  # grad_output is the caller's: never overwritten; a Linear's g W below is ours
        layers = list(self._modules.values())
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            if layer.holds_parameters:
                grad = layer.backward(grad, accumulate=accumulate, input_grad=input_grad or i > 0)
            else:
                cls = type(layer)
                in_place = new and cls.backward is cls._backward_in_place_of  # layer.in_place_ok("backward")
                grad = layer.backward_in_place(grad) if in_place else layer.backward(grad)
            new = layer.returns_new
        return grad


class MLP(Sequential):
    """A stack of ``Linear`` layers, ``activation`` after each hidden one, ``output_activation`` last.

    Args:
        widths: from input to output; ``[1, 1]`` is the seed's line ŷ = m·x + c, ``[1, 1, 1]`` with
            sigmoid its chain of one-neuron layers, ``[2, 64, 64, 1]`` a two-hidden-layer MLP.
        activation: after every hidden layer: ``sigmoid``, ``tanh``, ``relu`` or ``identity``.
        output_activation: after the last layer, or ``None`` for a linear output.
        bias: whether every ``Linear`` has a bias.

    Raises:
        ValueError: fewer than two widths, a width ≤ 0, or an unknown activation.
    """

    def __init__(
        self,
        widths: Sequence[int],
        activation: str = "sigmoid",
        output_activation: str | None = None,
        bias: bool = True,
    ) -> None:
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError(f"MLP needs at least an input and an output width, got widths={widths}")
        for i, w in enumerate(widths):
            if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
                raise ValueError(f"MLP widths must be positive integers; widths[{i}] = {w!r}")
        make_activation(activation)  # validate the name even when there is no hidden layer
        if output_activation is not None:
            make_activation(output_activation)
        layers: list[Layer] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(Linear(fan_in, fan_out, bias=bias))
            last = i == len(widths) - 2
            if not last:
                layers.append(make_activation(activation))
            elif output_activation is not None:
                layers.append(make_activation(output_activation))
        super().__init__(*layers)
        self.widths = widths
        self.activation = activation
        self.output_activation = output_activation

    @property
    def linears(self) -> list[Linear]:
        """The ``Linear`` layers, input first."""
        return [layer for layer in self if isinstance(layer, Linear)]

"""The training-loop events probescope speaks: fastai's names, declared once."""

from __future__ import annotations

EVENTS = (
    "before_fit",
    "before_epoch",
    "before_train",
    "before_batch",
    "after_pred",
    "after_loss",
    "before_backward",
    "after_backward",
    "after_step",
    "after_batch",
    "after_train",
    "before_validate",
    "after_validate",
    "after_epoch",
    "after_fit",
)


class Callback:
    """Something that reacts to training events; every hook is a no-op until overridden.

    Hooks receive the Monitor and the keyword arguments the event carries (``loss`` for
    ``after_loss``, the logged values for ``after_validate``).
    """

    order: int = 0

    def before_fit(self, monitor, **kwargs) -> None:
        """Training is about to start."""

    def before_epoch(self, monitor, **kwargs) -> None:
        """An epoch is about to start."""

    def before_train(self, monitor, **kwargs) -> None:
        """The training part of an epoch is about to start."""

    def before_batch(self, monitor, **kwargs) -> None:
        """A batch is about to be processed."""

    def after_pred(self, monitor, **kwargs) -> None:
        """The model's forward pass on the batch is done."""

    def after_loss(self, monitor, **kwargs) -> None:
        """The batch loss is known (``loss``)."""

    def before_backward(self, monitor, **kwargs) -> None:
        """The backward pass is about to start."""

    def after_backward(self, monitor, **kwargs) -> None:
        """Gradients are ready."""

    def after_step(self, monitor, **kwargs) -> None:
        """The optimizer step is done: the weights are those of the new step."""

    def after_batch(self, monitor, **kwargs) -> None:
        """The batch is finished."""

    def after_train(self, monitor, **kwargs) -> None:
        """The training part of an epoch is finished."""

    def before_validate(self, monitor, **kwargs) -> None:
        """Validation is about to start."""

    def after_validate(self, monitor, **kwargs) -> None:
        """Validation is done; the logged values arrive as keyword arguments."""

    def after_epoch(self, monitor, **kwargs) -> None:
        """An epoch is finished."""

    def after_fit(self, monitor, **kwargs) -> None:
        """Training is finished."""

import pytest
import torch

from mode_ray.models import ClassLabelEncoder


@pytest.mark.parametrize("prompt", [7, "7", "seven", "digit 7", "Digit Seven", " a digit 7 "])
def test_accepted_prompts(prompt) -> None:  # noqa: ANN001
    enc = ClassLabelEncoder()
    assert enc.label(prompt) == 7
    assert torch.equal(enc.encode([prompt]), torch.eye(10)[7:8])


@pytest.mark.parametrize("prompt", ["eleven", 10, -1, "cat", True, "digit"])
def test_unknown_prompts_are_a_clear_error(prompt) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="not a known class"):
        ClassLabelEncoder().label(prompt)

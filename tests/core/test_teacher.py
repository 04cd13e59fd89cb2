"""Teacher weights: EMA direction and timing, `base` = adapters off, and the leaf swap."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_sdft.config import Config
from mlx_sdft.formats.models import Adapters, open_model
from mlx_sdft.core.teacher import ema_update, init_teacher, step_teacher, trainable_leaves, using

INPUTS = mx.array([[1, 5, 9, 13, 2, 7, 30, 31]])


def _lora_model(path, fine_tune_type="lora"):
    mx.random.seed(0)
    model, base = open_model(path, adapters=Adapters(fine_tune_type, -1, Config().lora_parameters))
    return model, base


def _perturb(model):
    # Stand-in for training: move every trainable leaf (lora_b starts at 0, so LoRA is then active).
    model.update(
        tree_map(lambda v: v + 0.05 * mx.random.normal(v.shape), model.trainable_parameters())
    )
    mx.eval(model.parameters())


def test_ema_equals_student_at_step_0(tiny_model):
    model, base = _lora_model(tiny_model)
    teacher = init_teacher("ema", model, base)
    student = trainable_leaves(model)
    assert teacher.keys() == student.keys() and all(
        k.endswith(("lora_a", "lora_b")) for k in teacher
    )
    for k in teacher:
        np.testing.assert_array_equal(np.array(teacher[k]), np.array(student[k]))


def test_ema_moves_rate_of_the_way_toward_the_new_student(tiny_model):
    model, base = _lora_model(tiny_model)
    rate = 0.25  # asymmetric, so an inverted rate (0.75) fails
    teacher = init_teacher("ema", model, base)
    old = {k: np.array(v) for k, v in teacher.items()}
    opt = optim.SGD(learning_rate=0.1)
    opt.update(model, tree_map(lambda v: mx.ones_like(v), model.trainable_parameters()))
    new = {k: np.array(v) for k, v in trainable_leaves(model).items()}
    teacher = step_teacher("ema", teacher, model, rate)
    for k in old:
        np.testing.assert_allclose(
            np.array(teacher[k]), 0.75 * old[k] + 0.25 * new[k], rtol=1e-6, atol=1e-7
        )
        assert not np.allclose(np.array(teacher[k]), new[k])


def test_ema_update_is_pure():
    phi, theta = {"a": mx.array([0.0, 4.0])}, {"a": mx.array([8.0, 0.0])}
    np.testing.assert_allclose(np.array(ema_update(phi, theta, 0.01)["a"]), [0.08, 3.96], rtol=1e-6)
    np.testing.assert_array_equal(np.array(phi["a"]), [0.0, 4.0])


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora", "full"])
def test_base_teacher_is_the_model_with_adapters_off(tiny_model, fine_tune_type):
    plain, _ = open_model(tiny_model)
    expected = np.array(plain(INPUTS))
    model, base = _lora_model(tiny_model, fine_tune_type)
    teacher = init_teacher("base", model, base)
    _perturb(model)
    assert not np.allclose(np.array(model(INPUTS)), expected, atol=1e-4)  # the student has moved
    with using(model, teacher):
        np.testing.assert_allclose(np.array(model(INPUTS)), expected, atol=1e-5)
    # ...and the student's own leaves are back afterwards.
    assert not np.allclose(np.array(model(INPUTS)), expected, atol=1e-4)


def test_live_teacher_is_the_student(tiny_model):
    model, base = _lora_model(tiny_model)
    assert init_teacher("live", model, base) is None
    _perturb(model)
    before = np.array(model(INPUTS))
    with using(model, None):
        np.testing.assert_array_equal(np.array(model(INPUTS)), before)

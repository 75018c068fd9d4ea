"""A specialized teacher trained a few hundred steps verifies its own group best."""

import numpy as np
import pytest

from configs import teacher as teacher_config
from mstkd_jax.stages import teacher


@pytest.mark.slow
def test_group_a_teacher_verifies_group_a_better_than_chance_and_other_groups(tmp_path):
  config = teacher_config.smoke()            # 4 groups x 32 identities x 12 images, 32x32
  config.train.update(batch_size=32, epochs=17.0, log_every=50, checkpoint_every=1000)
  config.optim.lr_decay_epochs = (12, 15)
  config.num_devices = 1
  result = teacher.run(config, str(tmp_path))
  assert int(result["state"].step) == 204
  accuracy = {g: r["accuracy"] for g, r in result["verification"].items()}
  others = [accuracy[g] for g in ("group_b", "group_c", "group_d")]
  print("teacher/group_a accuracy per group:", accuracy)
  assert accuracy["group_a"] > 0.75
  assert accuracy["group_a"] > max(others) + 0.05
  assert accuracy["group_a"] > np.mean(others) + 0.10

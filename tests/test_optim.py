"""selfplay_jax.optim: `optimizer.name` builds the optimizer it names, on the run's lr schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax import config_validation
from selfplay_jax import config_lib, optim

CONFIG = "configs/default.py"
# Crosses every part of the schedule in a few steps: 2 * 2 = 4 warm-up steps at warmup.learning_rate,
# then a 3-step ramp to optimizer.learning_rate; a clip that binds on the gradients below.
SCHEDULE = ["warmup.rounds=2", "warmup.num_minibatches=2", "optimizer.warmup_steps=3",
            "optimizer.grad_clip=0.5"]
STEPS = 9


def load(*overrides):
  cfg = config_lib.load_config(CONFIG, list(overrides))
  config_validation.validate(cfg)
  return cfg


def params0():
  rng = np.random.default_rng(0)
  return {"w": rng.normal(size=(3, 4)).astype(np.float32),
          "b": rng.normal(size=(4,)).astype(np.float32)}


def grad_of(p):
  """Gradient of sum(0.5 * 1.5 * p**2 + 0.3 * p): depends on the params, so steps compound."""
  return jax.tree.map(lambda x: 1.5 * x + 0.3, p)


def run(tx, steps=STEPS):
  """Params after each of `steps` updates (NumPy float64 copies)."""
  p = jax.tree.map(jnp.asarray, params0())
  state = tx.init(p)
  update = jax.jit(tx.update)
  out = []
  for _ in range(steps):
    u, state = update(grad_of(p), state, p)
    p = optax.apply_updates(p, u)
    out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), p))
  return out


def assert_same(got, want, **tol):
  for step, (g, w) in enumerate(zip(got, want)):
    for key in w:
      np.testing.assert_allclose(g[key], w[key], err_msg=f"step {step} {key}", **tol)


def lr_at(cfg, step):
  """The schedule, written out: warm-up lr, then a linear ramp from 0 to the main lr."""
  o, w = cfg.optimizer, cfg.warmup
  warm = w.rounds * w.num_minibatches
  if step < warm:
    return w.learning_rate
  k = step - warm
  return o.learning_rate * min(1.0, k / o.warmup_steps) if o.warmup_steps else o.learning_rate


def lr_fn(cfg):
  """`lr_at` as a traceable optax schedule (independent of optax.join_schedules)."""
  o, w = cfg.optimizer, cfg.warmup
  warm = w.rounds * w.num_minibatches

  def schedule(count):
    ramp = (jnp.clip((count - warm) / o.warmup_steps, 0.0, 1.0) if o.warmup_steps else 1.0)
    return jnp.where(count < warm, w.learning_rate, o.learning_rate * ramp)
  return schedule


def np_clip(g, max_norm):
  if not max_norm:
    return g
  norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
  return g if norm < max_norm else {k: x / norm * max_norm for k, x in g.items()}


def numpy_adam_or_sgd(cfg, steps=STEPS):
  """Adam (eps 1e-8, bias-corrected) or plain SGD with L2 weight decay, in float64 NumPy."""
  o = cfg.optimizer
  p = {k: v.astype(np.float64) for k, v in params0().items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out = []
  for t in range(steps):
    g = np_clip({k: 1.5 * x + 0.3 for k, x in p.items()}, o.grad_clip)
    g = {k: g[k] + o.weight_decay * p[k] for k in p}
    lr = lr_at(cfg, t)
    if o.name == "sgd":
      p = {k: p[k] - lr * g[k] for k in p}
    else:
      m = {k: o.b1 * m[k] + (1 - o.b1) * g[k] for k in p}
      v = {k: o.b2 * v[k] + (1 - o.b2) * g[k] ** 2 for k in p}
      m_hat = {k: m[k] / (1 - o.b1 ** (t + 1)) for k in p}
      v_hat = {k: v[k] / (1 - o.b2 ** (t + 1)) for k in p}
      p = {k: p[k] - lr * m_hat[k] / (np.sqrt(v_hat[k]) + 1e-8) for k in p}
    out.append(dict(p))
  return out


def evaluate_reference(cfg) -> optax.GradientTransformation:
  """selfplay_jax.setup.build_optimizer as it was before optim.py (AdamW only), copied here."""
  o, w = cfg.optimizer, cfg.warmup
  main = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps) if o.warmup_steps else (
      optax.constant_schedule(o.learning_rate))
  warm_steps = w.rounds * w.num_minibatches
  lr = optax.join_schedules([optax.constant_schedule(w.learning_rate), main], [warm_steps])
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return optax.chain(*chain)


def test_optimizers_tuple():
  assert optim.OPTIMIZERS == ("adamw", "adam", "sgd", "lion", "adafactor")


@pytest.mark.parametrize("overrides", [
    [],
    SCHEDULE + ["optimizer.weight_decay=0.1"],
    ["warmup.rounds=0", "optimizer.grad_clip=0", "optimizer.b1=0.8", "optimizer.b2=0.99"],
])
def test_adamw_is_bit_identical_to_the_old_evaluate_construction(overrides):
  cfg = load(*overrides)
  assert cfg.optimizer.name == "adamw"
  tx, ref = optim.build_optimizer(cfg), evaluate_reference(cfg)
  p = jax.tree.map(jnp.asarray, params0())
  assert jax.tree.structure(tx.init(p)) == jax.tree.structure(ref.init(p))  # same checkpoint layout
  for got, want in zip(run(tx), run(ref)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("name", ["adam", "sgd"])
@pytest.mark.parametrize("extra", [[], ["optimizer.weight_decay=0.05"],
                                   ["optimizer.grad_clip=0", "optimizer.warmup_steps=0"]])
def test_adam_and_sgd_match_numpy(name, extra):
  cfg = load(*SCHEDULE, f"optimizer.name={name}", "optimizer.b1=0.8", "optimizer.b2=0.95", *extra)
  assert_same(run(optim.build_optimizer(cfg)), numpy_adam_or_sgd(cfg), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name, extra", [
    ("adamw", []),
    ("adamw", ["optimizer.weight_decay=0.1"]),
    ("lion", []),
    ("lion", ["optimizer.weight_decay=0.1", "optimizer.b2=0.99"]),
    ("adafactor", []),
    ("adafactor", ["optimizer.weight_decay=0.01"]),
])
def test_matches_an_independently_built_optax_chain(name, extra):
  cfg = load(*SCHEDULE, f"optimizer.name={name}", *extra)
  o, lr = cfg.optimizer, lr_fn(cfg)
  inner = {
      "adamw": lambda: optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
      "lion": lambda: optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
      "adafactor": lambda: optax.adafactor(
          lr, weight_decay_rate=o.weight_decay if o.weight_decay else None),
  }[name]()
  ref = optax.chain(optax.clip_by_global_norm(o.grad_clip), inner)
  got, want = run(optim.build_optimizer(cfg)), run(ref)
  assert_same(got, want, rtol=1e-6, atol=1e-7)
  assert not np.allclose(got[-1]["w"], params0()["w"])  # it did move


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_name_validates_and_trains(name):
  cfg = load(*SCHEDULE, f"optimizer.name={name}")
  p = run(optim.build_optimizer(cfg), steps=2)
  assert all(np.all(np.isfinite(x)) for x in p[-1].values())


@pytest.mark.parametrize("ramp", [0, 4])
def test_warmup_to_main_boundary_is_at_rounds_times_minibatches(ramp):
  """SGD without momentum and a constant gradient: each update is -lr(step) * g, so its size is
  warmup.learning_rate for exactly warmup.rounds * warmup.num_minibatches steps, then the main lr
  (after a linear ramp from 0 over optimizer.warmup_steps)."""
  cfg = load("optimizer.name=sgd", "optimizer.grad_clip=0", "warmup.rounds=3",
             "warmup.num_minibatches=2", "warmup.learning_rate=0.01",
             "optimizer.learning_rate=0.001", f"optimizer.warmup_steps={ramp}")
  tx = optim.build_optimizer(cfg)
  p = {"w": jnp.ones((2, 3), jnp.float32)}
  g = {"w": jnp.full((2, 3), 2.0, jnp.float32)}
  state, sizes = tx.init(p), []
  for _ in range(12):
    u, state = tx.update(g, state, p)
    sizes.append(float(-u["w"][0, 0]) / 2.0)  # the learning rate this step used
  warm = 3 * 2
  np.testing.assert_allclose(sizes[:warm], 0.01, rtol=1e-6)
  main = [0.001 * min(1.0, k / ramp) if ramp else 0.001 for k in range(12 - warm)]
  np.testing.assert_allclose(sizes[warm:], main, rtol=1e-6, atol=1e-12)
  assert sizes[warm - 1] != sizes[warm]


def test_warmup_cosine_decay_to_final_learning_rate():
  """warmup.final_learning_rate > 0: the warm-up rate follows lr_f + (lr_0 - lr_f)(1 + cos(pi t/T))/2
  over its T steps (written out in NumPy), then the main rate."""
  cfg = load("optimizer.name=sgd", "optimizer.grad_clip=0", "warmup.rounds=4",
             "warmup.num_minibatches=2", "warmup.learning_rate=0.01",
             "warmup.final_learning_rate=0.001", "optimizer.learning_rate=0.002")
  tx = optim.build_optimizer(cfg)
  p, g = {"w": jnp.ones((2,), jnp.float32)}, {"w": jnp.full((2,), 2.0, jnp.float32)}
  state, sizes = tx.init(p), []
  for _ in range(11):
    u, state = tx.update(g, state, p)
    sizes.append(float(-u["w"][0]) / 2.0)
  t = np.arange(8)
  want = 0.001 + (0.01 - 0.001) * 0.5 * (1 + np.cos(np.pi * t / 8))
  np.testing.assert_allclose(sizes[:8], want, rtol=1e-5)
  np.testing.assert_allclose(sizes[8:], 0.002, rtol=1e-6)


@pytest.mark.parametrize("ramp", [0, 2])
def test_main_phase_cosine_decay_to_final_learning_rate(ramp):
  """optimizer.final_learning_rate > 0: after the warm-up (and the optimizer.warmup_steps ramp),
  the rate follows lr_f + (lr_0 - lr_f)(1 + cos(pi t/T))/2 over the run's remaining T steps
  (rounds x num_epochs x num_minibatches), written out in NumPy, then stays at lr_f."""
  cfg = load("optimizer.name=sgd", "optimizer.grad_clip=0", "warmup.rounds=2",
             "warmup.num_minibatches=1", "warmup.learning_rate=0.01",
             "optimizer.learning_rate=0.004", "optimizer.final_learning_rate=0.0005",
             f"optimizer.warmup_steps={ramp}", "rounds=3", "algorithm.num_minibatches=2",
             "algorithm.num_epochs=2")
  assert optim.main_steps(cfg) == 12
  tx = optim.build_optimizer(cfg)
  p, g = {"w": jnp.ones((2,), jnp.float32)}, {"w": jnp.full((2,), 2.0, jnp.float32)}
  state, sizes = tx.init(p), []
  for _ in range(2 + 12 + 3):
    u, state = tx.update(g, state, p)
    sizes.append(float(-u["w"][0]) / 2.0)
  np.testing.assert_allclose(sizes[:2], 0.01, rtol=1e-6)
  main = np.asarray(sizes[2:])
  np.testing.assert_allclose(main[:ramp], 0.004 * np.arange(ramp) / max(ramp, 1), atol=1e-9)
  t, big_t = np.arange(12 - ramp), 12 - ramp
  want = 0.0005 + (0.004 - 0.0005) * 0.5 * (1 + np.cos(np.pi * t / big_t))
  np.testing.assert_allclose(main[ramp:12], want, rtol=1e-5)
  np.testing.assert_allclose(main[12:], 0.0005, rtol=1e-5)


def test_curriculum_decay_horizon_is_one_pass_per_round():
  cfg = config_lib.load_config("configs/easy_to_hard.py", [
      "rounds=5", "algorithm.num_minibatches=4", "algorithm.num_epochs=3"])
  config_validation.validate(cfg)
  assert optim.main_steps(cfg) == 20


@pytest.mark.parametrize("bad", ["sgdd", "AdamW", "momentum"])
def test_unknown_name_is_one_config_error_naming_the_key(bad):
  cfg = config_lib.load_config(CONFIG, [f"optimizer.name={bad}"])
  with pytest.raises(config_lib.ConfigError) as info:
    config_validation.validate(cfg)
  message = str(info.value)
  assert message.startswith("optimizer.name:") and repr(bad) in message
  assert all(name in message for name in optim.OPTIMIZERS)
  with pytest.raises(config_lib.ConfigError, match=r"^optimizer\.name: .*adafactor"):
    optim.build_optimizer(cfg)  # the builder refuses it too (a config that skipped validate)

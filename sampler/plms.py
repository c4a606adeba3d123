"""PLMS exactly as LDM's plms.py runs it (the papers' sampler: docs/samplers.md).

A linear multistep method on the DDIM update: each step replaces eps by an extrapolation
eps' from the current and up to three previous noise estimates.
  step 1: no history -> pseudo improved Euler: a DDIM step with eps gives x', the model is
          evaluated again at (x', t_next), eps' = (eps + eps_next) / 2   (2 model calls)
  step 2: eps' = (3 eps - e1) / 2                                        (Adams-Bashforth 2)
  step 3: eps' = (23 eps - 16 e1 + 5 e2) / 12                            (AB3)
  step 4+: eps' = (55 eps - 59 e1 + 37 e2 - 9 e3) / 24                   (AB4)
where e1, e2, e3 are the previous steps' eps (as evaluated, not eps'). So S steps cost S + 1
model calls: 50 steps = 51 calls.
"""
from .schedule import ddim_update


def plms_steps(model, x, ts, levels, eta=0.0, generator=None):
    """Yield (i, t, x_prev, pred_x0) for each step of timesteps `ts` (sampling order).

    model(x, t, ᾱ) -> guided noise estimate at timestep t (noise level ᾱ); levels: ᾱ of each
    timestep and, last, the level the run ends at (sampler/schedule.py, alpha_levels).
    Deterministic: eta and generator are not used.
    """
    old = []
    for i, t in enumerate(ts):
        a_t, a_prev = levels[i], levels[i + 1]
        eps = model(x, t, a_t)
        if not old:
            x_euler, _ = ddim_update(x, eps, a_t, a_prev)
            j = min(i + 1, len(ts) - 1)
            eps_next = model(x_euler, ts[j], levels[j])
            eps_prime = (eps + eps_next) / 2
        elif len(old) == 1:
            eps_prime = (3 * eps - old[-1]) / 2
        elif len(old) == 2:
            eps_prime = (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x, pred_x0 = ddim_update(x, eps_prime, a_t, a_prev)
        old = (old + [eps])[-3:]
        yield i, t, x, pred_x0

"""Schedules that move DPO's beta during training. Pure Python: margins in, beta out.

A margin here is the implicit reward margin of one pair without beta,
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),
so that moving beta does not feed back into the statistic that moves it.

`RiskBetaSchedule` ("risk", from the dynamic-dpo project). During a warm-up of W steps it only collects
margins; at the end of the warm-up it sets tau to their q-quantile. After that, at every step t with batch
margins h_1..h_B:
    p_t   = (1/B) * #{i : h_i > tau}            share of pairs above the threshold
    u_t   = p_t - p*                            p* is the target share
    beta <- beta * exp(alpha * tanh(gamma * u_t))
    tau  <- rho * tau + (1 - rho) * quantile_q(h_1..h_B)
More confident separation than targeted (u > 0) raises beta, pulling the policy back towards the
reference; less lowers it. Each step changes log(beta) by at most alpha, and beta stays positive because it
is only ever multiplied by a positive factor.

`BatchBetaSchedule` ("batch", beta-DPO: Wu et al., "beta-DPO: Direct Preference Optimization with Dynamic
beta", NeurIPS 2024, arXiv 2407.08639, Eq. 6). With beta_0 the configured beta and M_i = beta_0 * h_i the
individual reward discrepancy, the batch gets
    beta_batch = beta_0 * (1 + alpha * (mean_i M_i - M_0)),    M_0 <- m * M_0 + (1 - m) * mean_i M_i
where M_0 is a moving-average baseline (started at the first batch's mean, so the first step uses beta_0).
beta_batch is floored at `min_beta` to stay positive. The paper's beta-guided data filtering is not
included: every pair of the batch is trained on.
"""

from __future__ import annotations

import math


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated q-quantile (as numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class RiskBetaSchedule:
    """beta from the share of pair margins above a tracked quantile (see the module docstring)."""

    def __init__(
        self, beta: float, warmup_steps: int, quantile: float, target: float, alpha: float, gamma: float, tau_ema: float
    ):
        self.beta = beta
        self.warmup_steps, self.q, self.target = warmup_steps, quantile, target
        self.alpha, self.gamma, self.tau_ema = alpha, gamma, tau_ema
        self.steps = 0
        self.tau: float | None = None
        self.warmup_margins: list[float] = []

    def beta_for(self, margins: list[float]) -> float:
        """beta for the loss of this batch: the one set by earlier steps."""
        return self.beta

    def observe(self, margins: list[float]) -> None:
        """Update beta and tau after a training step with these pair margins."""
        self.steps += 1
        if self.tau is None:
            self.warmup_margins.extend(margins)
            if self.steps >= self.warmup_steps:
                self.tau = quantile(self.warmup_margins, self.q)
                self.warmup_margins = []
            return
        share = sum(m > self.tau for m in margins) / len(margins)
        self.beta *= math.exp(self.alpha * math.tanh(self.gamma * (share - self.target)))
        self.tau = self.tau_ema * self.tau + (1 - self.tau_ema) * quantile(margins, self.q)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "steps": self.steps, "tau": self.tau, "warmup_margins": self.warmup_margins}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.steps, self.tau = state["beta"], state["steps"], state["tau"]
        self.warmup_margins = list(state["warmup_margins"])


class BatchBetaSchedule:
    """beta-DPO's batch-level beta (see the module docstring)."""

    def __init__(self, beta: float, alpha: float, momentum: float, min_beta: float):
        self.beta0, self.alpha, self.momentum, self.min_beta = beta, alpha, momentum, min_beta
        self.beta = beta
        self.baseline: float | None = None

    def beta_for(self, margins: list[float]) -> float:
        mean = self.beta0 * sum(margins) / len(margins)
        baseline = mean if self.baseline is None else self.baseline
        self.beta = max(self.min_beta, self.beta0 * (1 + self.alpha * (mean - baseline)))
        return self.beta

    def observe(self, margins: list[float]) -> None:
        mean = self.beta0 * sum(margins) / len(margins)
        if self.baseline is None:
            self.baseline = mean
        else:
            self.baseline = self.momentum * self.baseline + (1 - self.momentum) * mean

    def state_dict(self) -> dict:
        return {"beta": self.beta, "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.baseline = state["beta"], state["baseline"]

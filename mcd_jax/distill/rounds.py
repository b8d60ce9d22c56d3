"""Distillation rounds: the teacher's step size and which round a step belongs to.

In round r = 0, 1, ..., R - 1 the teacher takes steps of Δ_r = 2^r / N₀ and the
student learns to take steps of 2Δ_r. At the end of a round the teacher becomes
the current student, so after R rounds the student samples in N₀ / 2^R steps
(N₀ = 1024 and R = 6 give 16 steps).
"""

import dataclasses


def _check_rounds(base_steps: int, num_rounds: int) -> None:
  if not isinstance(base_steps, int) or base_steps < 1:
    raise ValueError(f'base_steps (N₀) must be a positive integer, got {base_steps!r}.')
  if not isinstance(num_rounds, int) or num_rounds < 0:
    raise ValueError(f'num_rounds (R) must be an integer >= 0, got {num_rounds!r}.')
  if base_steps % (2 ** num_rounds):
    raise ValueError(
        f'base_steps ({base_steps}) must be divisible by 2**num_rounds '
        f'({2 ** num_rounds}) so that every round halves the number of steps.')


def delta_for_round(round_index: int, base_steps: int) -> float:
  """Returns Δ_r = 2^r / N₀, the teacher's step size in round r.

  Raises ValueError unless the student's step 2Δ_r fits in [0, 1], that is
  unless 0 <= r and 2^(r+1) <= N₀.
  """
  if not isinstance(round_index, int) or round_index < 0:
    raise ValueError(f'round_index must be an integer >= 0, got {round_index!r}.')
  if not isinstance(base_steps, int) or base_steps < 1:
    raise ValueError(f'base_steps (N₀) must be a positive integer, got {base_steps!r}.')
  if 2 ** (round_index + 1) > base_steps:
    raise ValueError(
        f'Round {round_index} would need a student step of 2**{round_index + 1} / '
        f'{base_steps} > 1. Use at most log2(base_steps) - 1 as the round index.')
  return 2 ** round_index / base_steps


def student_delta_for_round(round_index: int, base_steps: int) -> float:
  """Returns 2Δ_r, the step size the student learns in round r."""
  return 2.0 * delta_for_round(round_index, base_steps)


def student_steps_after(num_rounds: int, base_steps: int) -> int:
  """Returns N₀ / 2^R, the student's number of sampling steps after R rounds."""
  _check_rounds(base_steps, num_rounds)
  return base_steps // 2 ** num_rounds


@dataclasses.dataclass(frozen=True)
class RoundSchedule:
  """The rounds of one distillation run, each `steps_per_round` optimizer steps long."""

  base_steps: int  # N₀, the sampling steps of the round-0 teacher.
  num_rounds: int  # R.
  steps_per_round: int

  def __post_init__(self):
    _check_rounds(self.base_steps, self.num_rounds)
    if not isinstance(self.steps_per_round, int) or self.steps_per_round < 1:
      raise ValueError(
          f'steps_per_round must be a positive integer, got {self.steps_per_round!r}.')

  @property
  def total_steps(self) -> int:
    """The number of optimizer steps over all rounds."""
    return self.num_rounds * self.steps_per_round

  def round_for_step(self, global_step: int) -> tuple[int, int]:
    """Returns (round index, step within the round) for a 0-based optimizer step.

    Raises ValueError for a step outside [0, total_steps), because no round
    defines a teacher step size there.
    """
    if not 0 <= global_step < self.total_steps:
      raise ValueError(
          f'Step {global_step} lies outside the {self.num_rounds} rounds of '
          f'{self.steps_per_round} steps (valid steps: 0 to {self.total_steps - 1}). '
          'Set the number of training steps to at most num_rounds * steps_per_round.')
    return divmod(int(global_step), self.steps_per_round)

  def delta(self, round_index: int) -> float:
    """Returns Δ_r, the teacher's step size in round r (0 <= r < num_rounds)."""
    if not isinstance(round_index, int) or not 0 <= round_index < self.num_rounds:
      raise ValueError(
          f'round_index must be an integer in [0, {self.num_rounds}), got {round_index!r}.')
    return delta_for_round(round_index, self.base_steps)

  def student_delta(self, round_index: int) -> float:
    """Returns 2Δ_r, the student's step size in round r."""
    return 2.0 * self.delta(round_index)

  def student_steps_after(self, completed_rounds: int) -> int:
    """Returns the student's sampling steps after `completed_rounds` rounds, N₀ / 2^r."""
    if not isinstance(completed_rounds, int) or not 0 <= completed_rounds <= self.num_rounds:
      raise ValueError(f'completed_rounds must be an integer in [0, {self.num_rounds}], '
                       f'got {completed_rounds!r}.')
    return student_steps_after(completed_rounds, self.base_steps)

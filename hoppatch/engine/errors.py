"""What the engine raises. Each error has a stable `code`; a failed job's `error.code` is that code."""


class EngineError(Exception):
    """Base of the engine's errors."""

    code = "engine_error"


class ModelNotFound(EngineError):
    """The model reference names no built-in model, local directory or cached hub model."""

    code = "model_not_found"


class UnsupportedArchitecture(EngineError):
    """The model's family is not in the architecture table."""

    code = "unsupported_architecture"


class InvalidJob(EngineError):
    """The job asks for something the model cannot give (a layer it does not have, a prompt past its context)."""

    code = "invalid_input"


class NoCompositionFailure(EngineError):
    """No example is a compositional failure of this model, so there is nothing to patch."""

    code = "no_composition_failure"


class BudgetExceeded(EngineError):
    """The job ran past `budget.max_seconds`."""

    code = "budget_exceeded"


class DeltaMismatch(EngineError):
    """A delta file does not fit the model it is applied to (shape or base-weight hash)."""

    code = "delta_mismatch"


class Cancelled(EngineError):
    """The caller asked the job to stop."""

    code = "cancelled"

"""vLLM general plugin entry point (placeholder until the vLLM integration lands)."""


def register() -> None:
    return None

class RefineError(Exception):
    """Bad user input. The CLI prints it as one line (every problem, each with its fix) and exits with code 2."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("; ".join(self.problems))

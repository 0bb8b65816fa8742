"""Each chapter's measured claim, as one function that the chapter and ``benchmarks/run.py`` both call,
so a number printed in a chapter and the benchmark's number come from the same code."""

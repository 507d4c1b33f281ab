"""The one error type of the command line: a user mistake, reported in one line."""


class UsageError(Exception):
  """A user mistake: reported as one line and exit status 2, without a traceback."""


def does_not_fit(source, what: str, missing, unexpected, mismatched, fix: str) -> UsageError:
  example = (mismatched or unexpected or missing)[0]
  return UsageError(
      f"{source} does not fit {what}: {len(missing)} missing, {len(unexpected)} unexpected and"
      f" {len(mismatched)} wrongly shaped tensors (e.g. {example}). {fix}"
  )

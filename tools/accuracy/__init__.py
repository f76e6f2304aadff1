"""The pieces of tools/lowmem_accuracy.py (issue 11's accuracy experiments): ``experiments`` (tasks,
configurations, criteria), ``data``, ``training`` (one run), ``summary`` (means and verdicts), ``report``
(the page and its plot)."""

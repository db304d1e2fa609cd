"""The usage ledger: a row per request, prices and costs, spend reports."""

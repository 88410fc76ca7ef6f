"""The fault-injection harness: client processes run a workload while processes of the cluster
(and the clients themselves) are killed with SIGKILL; an oracle of acknowledged operations is
checked afterwards. `python -m tests.faults --minutes N` soaks; tests/test_fault_harness.py runs
a bounded round in the test suite. docs/RELIABILITY.md has the figures."""

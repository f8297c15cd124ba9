"""``seamwork demo``: the order system's sagas, killed mid-run and recovered.

* ``services``: inventory, payment, shipping, notification - one SQLite database
  and one ``IdempotencyLedger`` each;
* ``saga``: the order saga and the scenario's orders;
* ``worker``: the orchestrator process (``python -m seamwork.demo.worker``);
* ``scenario``: spawns it, SIGKILLs it mid-run, spawns the one that recovers;
* ``invariants``: checks the outcome against the services' own databases;
* ``run``: ``run_demo``, what ``seamwork demo`` calls; ``report`` shows it.

Nothing is imported here, so the worker process starts light.
"""

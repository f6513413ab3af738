"""Durable jobs on DBOS: the job model, the executor, and one module per workflow kind.

Job model (see :mod:`control_plane.workflows.jobs`): a row in the catalog's
``jobs`` table is the job the admin API shows (``GET /v1/jobs/{id}``); a DBOS
workflow with the *same id* executes it. The row and the workflow are created
in one catalog transaction (the DBOS system schema lives in the catalog
database), so a job can never exist without its workflow or vice versa.
Workflow steps write ``step``, ``progress`` and ``detail`` on the row.

Adding a kind (e.g. promotion, issue 6):

1. declare a :class:`~control_plane.workflows.kinds.JobKind` in ``kinds.py``
   (name, DBOS workflow name, steps, point of no return) and add it to ``KINDS``;
2. write ``control_plane/workflows/<kind>.py`` with
   ``@DBOS.workflow(name=KIND.workflow_name) async def run(job_id: str)``,
   structured with :func:`~control_plane.workflows.jobs.run_job`, and add the
   module to ``WORKFLOW_MODULES`` in ``executor.py``;
3. start it from the router with
   :func:`control_plane.catalog.service.start_tenant_job` (e.g.
   ``action=Action.START_MOVE, kind=PROMOTION, params={"mode": "online"}``):
   one catalog transaction moves the tenant's status, inserts the job row and
   enqueues the workflow; answer ``202 {"job": job_json(job)}``;
4. for a cancel of a *pending* job, register a catalog-only compensation in
   ``control_plane.catalog.service.PENDING_COMPENSATIONS`` (a running job's
   cancel runs the workflow's own compensation step).
"""

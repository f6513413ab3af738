"""Entry point of the ``tenantctl-infra`` Pulumi project (the shared stack).

Pulumi runs this file as ``__main__``; importing :mod:`infra` elsewhere
(the provisioner, the tests) declares nothing.
"""

from infra.shared import shared_program

shared_program()

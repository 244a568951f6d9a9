# twistd -ny loom.tac: the same service as `twistd loom`, configured by
# LOOM_CONFIG (YAML files) and LOOM_* environment variables.
from twisted.application import service

from loom.tap import Options, makeService

options = Options()
options.parseOptions([])
application = service.Application("loom")
makeService(options).setServiceParent(application)

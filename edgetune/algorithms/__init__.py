"""Algorithm registry: an explicit dict, no import-time decorators."""

from edgetune.algorithms.base import AlgorithmSpec
from edgetune.algorithms.deft import DeftClient, DeftServer
from edgetune.algorithms.dppf import DppfClient, DppfServer
from edgetune.algorithms.kavg import KavgClient, KavgServer
from edgetune.algorithms.lowrank import LowrankClient, LowrankServer
from edgetune.algorithms.spsa import SpsaClient, SpsaServer

ALGORITHMS: dict[str, AlgorithmSpec] = {
    "spsa": AlgorithmSpec("spsa", SpsaServer, SpsaClient),
    "kavg": AlgorithmSpec("kavg", KavgServer, KavgClient),
    "lowrank": AlgorithmSpec("lowrank", LowrankServer, LowrankClient),
    "deft": AlgorithmSpec("deft", DeftServer, DeftClient),
    "dppf": AlgorithmSpec("dppf", DppfServer, DppfClient),
}

"""The planner: profile tables -> simulator -> search -> Plan. Pure Python + numpy/scipy.

Never imports torch (tests/planner/test_no_torch.py), so it is a library usable anywhere and
tested in milliseconds. Data flow:

    workload.py (lengths.py)   profile.py / analytic.py
              \\                   /
         candidate.py (WorkloadStats)  costs.py (stage step times, memory; layout.py stages)
                       \\            /
            simulator.py (closed form)  <-- agree within 2% -->  des.py (discrete events)
                         |
            scheduler.py (bnb.py: branch and bound / exhaustive over every policy and TP
                          degree; objective.py: cheap bounds)
                         |
            planning.py -> plan.py (the Plan value sent to the runner)

Glossary (the paper's symbols; used only inside the planner):
- B_E: encode batch size, requests encoded together (static/continuous: the batch size).
- B_D: decode batch size in steady state, by Little's law: RRA ``B_E * E[ceil(S/N_D)]``
  (the batch right after an encode), WAA ``B_E * E[S]`` (decoder-bound).
- N_D: RRA only: decode iterations between two encodes (encoding frequency 1/N_D).
- B_m: WAA only: number of decode micro-batches in flight in the decoder pipeline.
- S, I: output and input lengths in tokens; s99 the 99th-percentile output length.
- TP degree (tp) and number of TP workers: partial tensor parallelism; k workers form k/tp
  TP stages, the rest run alone.
- eps_T, eps_L: search tolerances on throughput and latency (see bnb.py; eps_T defaults to 0
  in scheduler.py).
- SLA-(b): latency of a p99-output-length request from its encode start; SLA-(a): 99th
  percentile latency over all requests.
"""

from coordinator.planner.planning import make_plan
from coordinator.planner.profile import Profile
from coordinator.planner.workload import Workload, parse_workload, preset

__all__ = ["Profile", "Workload", "make_plan", "parse_workload", "preset"]

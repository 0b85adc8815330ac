"""`exegpt bench`: the paper's evaluation on the real mesh, predicted beside measured.

Data flow of one invocation (each box a module of this package):

    config     BenchConfig (flags, validated)         workset   K seeded requests from W
       |                                                  |
    bounds     latency bounds: static baseline over batch sizes (measured or planner's),
       |       bottom 10/30/70% + no bound
       v
    evaluate   for bound x policy: planner -> Plan -> plan_launch -> LaunchSpec -> LocalMesh
       |       (meshrun: same K requests, lifecycles back in each Result)
       v
    measure    lifecycles -> throughput, p99-length latency, p99, TTFT, TPOT, bound met
    hfref      transformers `generate`, static batches, same prompts (external reference)
    report     results.json, results.md          plots   PNG: throughput vs bound,
                                                          predicted vs measured, timeline

Every policy the planner produces goes through the same plan -> LaunchSpec path
(`coordinator.plan_launch.plan_fields`), so a policy this build cannot run is reported with
the runner's reason instead of being run differently.
"""

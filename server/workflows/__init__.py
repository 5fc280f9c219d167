"""Deterministic workflows (`workflow:<name>`).

    config.py    the deployment's workflows/*.yaml: typed state, the six node kinds
    values.py    state paths and templates
    store.py     runs in SQL (workflow_runs), written after every node
    runner.py    the WorkflowDirector (served names, scopes, start-up checks) and the
                 WorkflowTurn: the actor's part and the stage that runs the nodes
"""

"""Specialist agents behind one endpoint (`agent:<name>`).

    config.py    the deployment's agents/*.yaml: AgentConfig, load_agents
    handoff.py   the handoff decision: candidates ranked, a constrained transfer call
    director.py  the agent stage: the conversation's holder, the chain of decisions,
                 the AgentTurn the API runs (instructions, tools, memory, usage split)
"""

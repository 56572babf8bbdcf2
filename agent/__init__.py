"""LangGraph agent: task definition, data generation, training, judging, deploy."""

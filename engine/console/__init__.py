"""/console: a small web page for people (live charts, rule funnels, profile inspector).

Public: console_routes (engine.console.routes), Sessions (engine.console.session),
the pure JSON builders in engine.console.data.
"""

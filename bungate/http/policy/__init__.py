"""
The access and traffic policy a route applies to a request, each in a module of its own:
who may call (``auth``), how often (``ratelimit``), from which origins (``cors``), and
the headers and paths changed on the way (``rewrite``). The dispatcher runs them in that
order, before the route's middlewares and the proxy (internal).
"""

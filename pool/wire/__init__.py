"""The wire: the RPC protocol (frames, message shapes, the method table; pure), the asyncio RPC server and
clients, and the control channel between the pool and an app. Imports nothing above itself."""

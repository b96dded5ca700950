"""Entry points above the HTTP layer that run the same app on several machines (docs/scale-out.md).

``deploy.ray_serve`` serves ``api.app.create_app`` as Ray Serve replicas (a local cluster with
one command, a Serve config file, or KubeRay's ``RayService`` in ``deploy/kuberay/``). Like
``api_server.py`` it only starts the app: everything a request does is the single server's
code. Only this package imports Ray, and only the ``ray`` extra installs it.
"""

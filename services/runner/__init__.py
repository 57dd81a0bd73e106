"""The no-Docker runner: start the stack of a compose file as supervisord programs.

compose.yaml is the one definition of the services: their commands, environment and mounts.
This package reads it (with the ``.env`` interpolation, ``env_file``, profiles and override
files, as Docker Compose does for the subset the project uses), maps the bind-mounted
container paths back to host paths, and renders a supervisord.conf that runs each service as
a local process. ``python -m services.runner --help`` lists the commands.
"""

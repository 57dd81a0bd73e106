"""The teacher link: both ends of the teacher ↔ trainer protocol (see protocol.py)."""
from shared.link.client import TeacherClient, TeacherHandle
from shared.link.in_process import InProcessTeacher
from shared.link.protocol import LinkError, RequestError, RequestSpec
from shared.link.server import TeacherServer
from shared.link.teacher_model import TeacherModel

__all__ = ["InProcessTeacher", "LinkError", "RequestError", "RequestSpec", "TeacherClient",
           "TeacherHandle", "TeacherModel", "TeacherServer"]

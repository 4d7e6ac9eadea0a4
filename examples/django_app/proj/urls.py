from approvals import views
from django.urls import path

urlpatterns = [
    path("expenses/", views.submit_expense),
    path("approvals/resume/", views.resume),
]

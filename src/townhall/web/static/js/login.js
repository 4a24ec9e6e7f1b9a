import { post, saveSession } from "./api.js";
import { $, nav } from "./ui.js";

/** Where to go after logging in: ?next=/a/local/path, else home. */
export function nextPath() {
  const next = new URLSearchParams(location.search).get("next") ?? "/";
  return next.startsWith("/") && !next.startsWith("//") ? next : "/";
}

export async function logIn(handle, password) {
  const { token } = await post("/api/v1/sessions", { handle, password });
  saveSession(handle, token);
}

if (document.querySelector("main").dataset.page === "login") {
  nav();
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = event.submitter;
    button.disabled = true;
    $("#form-error").textContent = "";
    try {
      await logIn($("#handle").value.trim(), $("#password").value);
      location.assign(nextPath());
    } catch (err) {
      $("#form-error").textContent = err.message;
      button.disabled = false;
    }
  });
}

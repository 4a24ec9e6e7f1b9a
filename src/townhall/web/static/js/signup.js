import { post } from "./api.js";
import { logIn, nextPath } from "./login.js";
import { $, nav } from "./ui.js";

nav();
$("#signup-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = event.submitter;
  button.disabled = true;
  $("#form-error").textContent = "";
  const handle = $("#handle").value.trim();
  const password = $("#password").value;
  try {
    await post("/api/v1/accounts", { handle, password });
    await logIn(handle, password);
    location.assign(nextPath());
  } catch (err) {
    $("#form-error").textContent = err.message;
    button.disabled = false;
  }
});

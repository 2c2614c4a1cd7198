// The conversation's messages, drawn alike by the desktop chat page (app.js, served by `edgespec serve`) and the
// web app (apps/web, which copies this file when it builds).

export function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `msg ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  message.append(label, content);
  document.getElementById("conversation").append(message);
  message.scrollIntoView({block: "end"});
  return message;
}

export function addNote(message, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  message.append(note);
}
